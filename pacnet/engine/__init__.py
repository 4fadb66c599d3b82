"""The engine: solver, data, metrics, checkpoints, the train/test loop.

* :mod:`~pacnet.engine.solver` -- the ``solver:`` section, Caffe lr policies, CaffeSGD, Solver
* :mod:`~pacnet.engine.data` -- the ``data:`` section, :func:`make_dataset`, loaders
  (:mod:`~pacnet.engine.datasets`, :mod:`~pacnet.engine.transforms`,
  :mod:`~pacnet.engine.synthetic`, :mod:`~pacnet.engine.formats` behind it)
* :mod:`~pacnet.engine.metrics` -- mIoU/accuracies, RMSE, EPE, summed over DDP ranks
* :mod:`~pacnet.engine.checkpoint` -- atomic safetensors + training-state checkpoints
* :mod:`~pacnet.engine.workdir` -- a run's folder: config, environment, metrics, checkpoints
* :mod:`~pacnet.engine.trainer` -- :func:`train`, :func:`test`, :func:`benchmark`

Submodules are imported on use (``import pacnet`` stays light).
"""
