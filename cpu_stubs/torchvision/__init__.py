"""Import-only CPU stand-in for torchvision (see ../README.md).

Any ``torchvision.<sub.module>`` imports and any attribute exists, so module-level imports in SGLang and
transformers succeed; nothing works: calling or using a stand-in object raises. Text models never do.
"""

import importlib.abc
import importlib.machinery
import sys
import types

__version__ = "0.0.0+icecache.cpu.stub"


class _Missing:
    """A placeholder for any torchvision object: attribute access chains, use raises."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Missing(f"{self._name}.{attr}")

    def __call__(self, *args, **kwargs):
        raise NotImplementedError(f"{self._name}: torchvision is a CPU import stand-in here (cpu_stubs/)")

    def __mro_entries__(self, bases):  # subclassing a stand-in class yields a plain class
        return (object,)

    def __repr__(self) -> str:
        return f"<torchvision stand-in {self._name}>"


def _module_getattr(modname: str):
    def __getattr__(attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Missing(f"{modname}.{attr}")

    return __getattr__


class _Loader(importlib.abc.Loader):
    def create_module(self, spec):
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        module.__path__ = []
        module.__getattr__ = _module_getattr(module.__name__)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, _Loader(), is_package=True)
        return None


if not any(isinstance(f, _Finder) for f in sys.meta_path):
    sys.meta_path.append(_Finder())

__getattr__ = _module_getattr(__name__)
