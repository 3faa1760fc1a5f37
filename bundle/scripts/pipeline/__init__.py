"""The method, one module a step, in the order a scan goes through them: read -> orient -> lungs -> crop (context)
-> classify -> scope -> candidates (icm) -> screen -> assemble -> write. ``segmenter`` chains the steps of one slice,
``scan_inferer`` those of one scan, ``settings`` holds their settings and presets, ``runner`` runs many scans."""
