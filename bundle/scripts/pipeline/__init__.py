"""The method, one module a step, in the order the data goes through them."""
