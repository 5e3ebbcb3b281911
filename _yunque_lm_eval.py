"""Lets the plain `lm_eval` command find yunque's model: `lm_eval --model yunque --model_args pretrained=DIR`.

lm-eval (0.4.x up to 0.4.13) never reads plugin entry points: it knows only the models in its own
registry, which `lm_eval.models` fills with lazy "module:Class" placeholders when it is imported.
An installed package therefore has no declarative way to add a model, so yunque's wheel ships
`_yunque_lm_eval.pth` (one line: `import _yunque_lm_eval`), which Python's `site` runs at start-up.

That start-up cost must stay near zero for every Python process in the environment, so this module
imports only `sys` and puts one finder on `sys.meta_path` that compares each imported name with
"lm_eval.models" and otherwise does nothing. When lm-eval imports that module, the finder lets the
normal finders locate it and, right after it has run, registers "yunque" the same lazy way
lm-eval registers its own models. yunque and torch are imported only when `--model yunque` is
actually used; the finder then leaves `sys.meta_path`. lm-eval versions that do read the
`lm_eval.models` entry point group find yunque there first, and this hook then changes nothing.
"""

import sys

NAME = "yunque"
TARGET = "yunque.evaluate.lm_eval_adapter:YunqueLM"
_TRIGGER = "lm_eval.models"


def register() -> None:
    """Register "yunque" as a lazy placeholder, as `lm_eval.models` does with its own models."""
    try:
        from lm_eval.api.registry import model_registry
    except ImportError:  # older lm-eval without lazy registration imports every model eagerly anyway
        import yunque.evaluate.lm_eval_adapter  # noqa: F401  (registers by decorator)

        return
    if NAME not in model_registry:
        model_registry.register(NAME, target=TARGET)


class _Finder:
    """A meta path finder that never finds anything itself; it only wraps `lm_eval.models`' loader."""

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname != _TRIGGER:
            return None
        for finder in sys.meta_path:
            if finder is cls or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        original = loader.exec_module

        def exec_module(module):
            # The patch lives on this one loader instance; drop it before running so that the
            # loader is plain again whatever happens (a re-import, an exception in lm-eval).
            try:
                del loader.exec_module
            except AttributeError:
                pass
            original(module)
            try:
                register()
            except Exception as e:  # never break lm-eval's own models over ours
                import warnings

                warnings.warn(f"yunque: could not register the lm-eval model 'yunque': {e}", stacklevel=2)
            if cls in sys.meta_path:
                sys.meta_path.remove(cls)

        try:
            loader.exec_module = exec_module
        except AttributeError:  # a loader we cannot patch: leave lm-eval as it is
            return spec
        return spec


def install() -> None:
    if "lm_eval.models" in sys.modules:  # imported before us (unusual): register right away
        register()
    elif _Finder not in sys.meta_path:
        sys.meta_path.insert(0, _Finder)


install()
