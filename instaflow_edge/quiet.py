"""Quiet the libraries underneath: their info logs and per-file progress bars are noise in our CLI."""


def quiet_libraries() -> None:
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):
        library.set_verbosity_error()
        library.disable_progress_bar()


def no_progress_bars() -> None:
    """`--quiet`: no progress bar from any code in this process, ours or a library's (coremltools
    draws four per converted graph). Every bar is a tqdm, whatever `disable` its caller passed."""
    from tqdm import std

    draw = std.tqdm.__init__

    def disabled(self, *args, **kwargs):
        draw(self, *args, **{**kwargs, "disable": True})

    std.tqdm.__init__ = disabled
