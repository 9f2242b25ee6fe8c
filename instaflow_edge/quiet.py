"""Quiet the libraries underneath: their info logs and per-file progress bars are noise in our CLI."""


def quiet_libraries() -> None:
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):
        library.set_verbosity_error()
        library.disable_progress_bar()
