"""The configs inside the package: the documented defaults (`base`) and each dataset's paper
settings with its `:cpu` and `:test` variants (`tetrominoes`, `mnist_hard`, `clevr6`, `celeba`,
`h36m`; `datasets.DatasetInfo.config` names them).

The tools read defaults and paper settings from here, never from a `configs`
folder of the working directory. The repository's top-level `configs/*.py`
are the files given to `--config` and re-export these.
"""
