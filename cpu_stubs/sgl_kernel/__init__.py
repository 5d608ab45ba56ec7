"""CPU stand-in for sgl_kernel: importable, and every function raises when called (see ../README.md)."""


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)

    def _missing(*args, **kwargs):
        raise NotImplementedError(
            f"sgl_kernel.{name} is not available: this is the CPU stand-in from icecache-sglang's "
            "cpu_stubs/ (install sglang-kernel on a GPU machine)")

    _missing.__name__ = name
    return _missing
