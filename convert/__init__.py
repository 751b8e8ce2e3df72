"""The conversion stage (installed as `vibevoice_mlx.convert`): cast, quantize and write MLX model folders."""

import sys
import types


class _CallablePackage(types.ModuleType):
    """`vibevoice_mlx.convert` is both this package and, in the flat API, the `convert` function: once the
    package is imported it shadows the lazy attribute of `vibevoice_mlx`, so calling it calls the function."""

    def __call__(self, *args, **kwargs):
        from .convert import convert

        return convert(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
