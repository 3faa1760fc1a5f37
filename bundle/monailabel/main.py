"""A MONAI Label app serving this bundle: whole-scan inference for 3D Slicer / OHIF and weak-label training.

It does what MONAI Label's stock ``monaibundle`` sample app does, with MONAI Label's own ``BundleInferTask`` and
``BundleTrainTask`` on the bundle's ``configs/inference.json`` and ``configs/train.json``; the sample app itself is
not part of the monailabel wheel (``monailabel apps --download`` fetches it from GitHub), so the bundle ships this
one. It finds the bundle as the stock app does, in ``<app>/model/<name>`` for each name of ``--conf models``, and
otherwise uses the bundle it lives in (``bundle/monailabel/`` inside the bundle), so that

    monailabel start_server --app bundle/monailabel --studies <folder of CT volumes> \
        --conf models lung_nodule_ws_segmentation --conf zoo_source github

serves the bundle as it is. Nothing else is changed: on volumes, MONAI Label's writer keeps the result's affine
(``monailabel/transform/writer.py``: ``write_itk(..., affine if len(image_np.shape) > 2 else None, ...)``), and the
bundle's post-processing (``InvertTogetherd``) has already put the mask on the study's grid.
"""

import os

from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.bundle import BundleInferTask
from monailabel.tasks.train.bundle import BundleTrainTask

DEFAULT_MODEL = "lung_nodule_ws_segmentation"


def bundle_paths(app_dir, conf):
    """``{name: bundle folder}`` for ``--conf models`` (comma-separated), as the stock app lays them out."""
    names = [m.strip() for m in conf.get("models", DEFAULT_MODEL).split(",") if m.strip()]
    own = os.path.dirname(os.path.abspath(app_dir))
    paths = {}
    for name in names:
        local = os.path.join(app_dir, "model", name)
        if os.path.isdir(local):
            paths[name] = local
        elif os.path.isfile(os.path.join(own, "configs", "inference.json")):
            paths[name] = own
        else:
            raise ValueError(f"bundle {name!r} not found in {local} nor around the app ({own})")
    return paths


class LungNoduleApp(MONAILabelApp):
    """Inference and training of the weakly supervised lung nodule bundle(s)."""

    def __init__(self, app_dir, studies, conf):
        self.models = bundle_paths(app_dir, conf)
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="Weakly supervised lung nodule segmentation",
            description="Whole-CT nodule masks from a slice classifier's activation maps; training from marked slices",
            version="1",
        )

    def init_infers(self):
        return {
            name: BundleInferTask(path, self.conf, type=InferType.SEGMENTATION) for name, path in self.models.items()
        }

    def init_trainers(self):
        tasks = {name: BundleTrainTask(path, self.conf) for name, path in self.models.items()}
        return {name: task for name, task in tasks.items() if task.is_valid()}
