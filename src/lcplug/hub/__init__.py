"""The Hugging Face Hub: publish a patched checkpoint with its card, and download one for reloading.

    lcplug.publish("out/final", "me/llama-32k", license="apache-2.0")   # or a model object
    model = lcplug.from_pretrained("me/llama-32k")                      # downloads, re-patches

Modules, one job each: `bundle` (which files go up, and the card), `publish` (the Hub steps),
`download` (snapshot with an early manifest check), `run_outputs` (what a training run left beside
its final/), `client` (HfApi and error translation). See docs/hub.md.
"""

from .bundle import Bundle, Upload, build_bundle
from .client import HubError
from .download import download
from .publish import PublishResult, publish

__all__ = ["Bundle", "HubError", "PublishResult", "Upload", "build_bundle", "download", "publish"]
