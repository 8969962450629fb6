"""Student training on Ray Train: MaskCLIP+ and GLIP self-training from stored labels.

``labelmill.training`` holds the training data path (:mod:`.data`,
:mod:`.targets`, :mod:`.augment`), the configs (:mod:`.config`), the tasks
(:mod:`.maskclip_plus`, :mod:`.glip`), the Ray Train loop (:mod:`.loop`) and
evaluation (:mod:`.evaluate`).  ``labelmill.pipelines.train`` composes them.
"""


def read_metrics(run: str, name: str | None = None, storage_options: dict | None = None):
    """The per-step metrics of a training run (its run folder, ``checkpoint.path/checkpoint.name``) as pandas."""
    from labelmill.training.loop import read_metrics as read

    return read(run, name, storage_options)
