"""``save_pretrained`` / ``push_to_hub`` / ``from_pretrained`` methods for any model built by
``semask.create_model`` (mix :class:`HubMixin` into an ``nn.Module`` subclass)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Type, TypeVar, Union

from . import folder as io

__all__ = ["HubMixin"]

T = TypeVar("T", bound="HubMixin")


class HubMixin:
    """Hub methods on top of :mod:`semask.core.folder` (config.json + model.safetensors + README.md).

    ``class MyModel(HubMixin, nn.Module)``; the instance must come from ``semask.create_model``
    (which records the config that rebuilds it).
    """

    def save_pretrained(self, save_directory: Union[str, os.PathLike], *, metrics: Optional[Mapping[str, float]] = None,
                        model_card: bool = True, extra: Optional[Dict[str, Any]] = None) -> Path:
        """Write config.json, model.safetensors and a model card into ``save_directory``."""
        return io.save_pretrained(self, save_directory, extra, model_card=model_card, metrics=metrics)  # type: ignore[arg-type]

    def push_to_hub(self, repo_id: str, *, commit_message: str = "Upload SeMask model", private: Optional[bool] = None,
                    token: Optional[str] = None, revision: Optional[str] = None, create_pr: bool = False,
                    metrics: Optional[Mapping[str, float]] = None) -> Any:
        """Upload config.json + model.safetensors + README.md to ``repo_id`` (created if needed)."""
        return io.push_to_hub(self, repo_id, commit_message=commit_message, private=private, token=token,  # type: ignore[arg-type]
                              revision=revision, create_pr=create_pr, metrics=metrics)

    @classmethod
    def from_pretrained(cls: Type[T], dir_or_repo: Union[str, os.PathLike], num_classes: Optional[int] = None, *,
                        revision: Optional[str] = None, cache_dir: Optional[Union[str, os.PathLike]] = None,
                        **kwargs: Any) -> T:
        """Rebuild and load a saved model (folder or ``org/repo[@rev]``); it must be a ``cls``."""
        model = io.load_model_dir(dir_or_repo, num_classes, revision=revision, cache_dir=cache_dir, **kwargs)
        if not isinstance(model, cls):
            raise TypeError(f"{dir_or_repo} holds a {type(model).__name__}, not a {cls.__name__}; "
                            "use semask.from_pretrained(...) to load any semask model")
        return model
