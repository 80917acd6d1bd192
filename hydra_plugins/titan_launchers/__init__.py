"""titan's Hydra launchers (`hydra/launcher=slurm`, `hydra/launcher=local`); configs in conf/hydra/launcher/.

Hydra finds them because `hydra_plugins` is a namespace package (no __init__.py in it) on the path.
"""
