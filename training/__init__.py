"""Student training on Ray Train: MaskCLIP+ and GLIP self-training from stored labels.

``labelmill.training`` holds the training data path (:mod:`.data`,
:mod:`.targets`, :mod:`.augment`), the configs (:mod:`.config`), the tasks
(:mod:`.maskclip_plus`, :mod:`.glip`), the Ray Train loop (:mod:`.loop`) and
evaluation (:mod:`.evaluate`).  ``labelmill.pipelines.train`` composes them.
"""
