"""Lightning adapter: ``Trainer(callbacks=[KernelDVFS()])``."""
from .callback import KernelDVFS

__all__ = ["KernelDVFS"]
