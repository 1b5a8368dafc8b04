"""An `lmms-eval <https://github.com/EvolvingLMMs-Lab/lmms-eval>`_ model backed by a patched mmtoken model.

lmms-eval is an optional dependency. Installed beside mmtoken, it finds this model through the
``lmms_eval.models`` entry point, so any lmms-eval task runs on a compressed model::

    python -m lmms_eval --model mmtoken --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=fastv:k=2;keep=0.25 \\
        --tasks pope --batch_size 8

``--model_args`` (comma-separated ``key=value``): ``pretrained`` (a built-in name such as ``tiny-llava``, a
local folder or a cached Hugging Face id; default ``tiny-llava``), ``method`` (an mmtoken spec; lmms-eval
splits its arguments on commas, so write the commas *inside* a spec as ``;`` — ``fastv:k=2;keep=0.25`` —
and compositions with ``+`` as usual; default ``none``), ``device``, ``dtype``, ``attn`` (default
``sdpa``), ``batch_size``, ``max_new_tokens`` (used when a task sets none; default 32).

Each question is put into the model's own prompt template (:meth:`mmtoken.models.LoadedModel.format`),
with the task's context as the question. ``generate_until`` decodes greedily unless the task asks for
sampling (``temperature`` > 0 with ``do_sample``) or beams (``num_beams``); a decode-stage method (OPERA)
takes over decoding as in ``mmtoken bench``. Outputs are cut at the task's ``until`` strings.
``loglikelihood`` returns the continuation's summed log-probability and whether greedy decoding would
produce it, one request at a time. One image (or none) per question: the LLaVA models mmtoken patches
take one image per prompt.
"""

from __future__ import annotations

from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms

from .errors import MmtokenError
from .models import load_model


def manifest():
    """The ``lmms_eval.models`` entry point: registers this class as ``--model mmtoken``."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="mmtoken", simple_class_path="mmtoken.lmms_eval.MmtokenLMMS")


def _spec(method: str) -> str:
    return str(method).replace(";", ",")


class MmtokenLMMS(lmms):
    """lmms-eval model: an mmtoken-loaded LLaVA / LLaVA-NeXT, patched with ``method`` for the whole run."""

    def __init__(self, pretrained: str = "tiny-llava", method: str = "none", device: str = "cpu", dtype: str = "float32",
                 attn: str = "sdpa", batch_size: int | str = 1, max_new_tokens: int = 32, **kwargs: Any):
        super().__init__()
        import mmtoken

        unknown = {k: v for k, v in kwargs.items() if k not in ("max_batch_size",) and v is not None}
        if unknown:
            raise MmtokenError(f"mmtoken lmms-eval model: unknown model_args {sorted(unknown)}; known: pretrained, method, "
                               "device, dtype, attn, batch_size, max_new_tokens")
        self.lm = load_model(str(pretrained), device=str(device), dtype=str(dtype), attn=str(attn))
        self.method = _spec(method)
        self.handle = mmtoken.apply(self.lm.model, self.method) if self.method not in ("", "none") else None
        self.device_name = str(device)
        self.batch_size_per_gpu = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def tokenizer(self):
        return self.lm.processor.tokenizer

    # -- helpers ------------------------------------------------------------------------------------

    def _visual(self, req: Instance):
        doc_to_visual, doc_id, task, split = req.args[2:6]
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
        visuals = [v for v in (visuals or []) if v is not None]
        if len(visuals) > 1:
            raise MmtokenError(f"{task} doc {doc_id}: {len(visuals)} images; the models mmtoken patches take one image per question")
        return visuals[0].convert("RGB") if visuals else None

    def _inputs(self, texts: list[str], images: list) -> dict:
        prompts = [self.lm.format(t, image is not None) for t, image in zip(texts, images)]
        kw: dict[str, Any] = {"text": prompts, "return_tensors": "pt", "padding": True}
        present = [im for im in images if im is not None]
        if present and len(present) != len(images):
            raise MmtokenError("a batch mixes questions with and without an image; use batch_size=1 for such a task")
        if present:
            kw["images"] = present
        enc = self.lm.processor(**kw)
        return {k: v.to(self.device_name) if torch.is_tensor(v) else v for k, v in enc.items()}

    def _generate_kwargs(self, gen: dict) -> dict:
        gen = dict(gen or {})
        out: dict[str, Any] = {"max_new_tokens": int(gen.get("max_new_tokens") or self.max_new_tokens)}
        temperature = float(gen.get("temperature") or 0.0)
        if temperature > 0 and gen.get("do_sample", True):
            out.update(do_sample=True, temperature=temperature)
            if gen.get("top_p") is not None:
                out["top_p"] = float(gen["top_p"])
        else:
            out["do_sample"] = False
        if gen.get("num_beams") and int(gen["num_beams"]) > 1:
            out["num_beams"] = int(gen["num_beams"])
        return out

    # -- lmms interface -----------------------------------------------------------------------------

    def generate_until(self, requests: list[Instance]) -> list[str]:
        from tqdm import tqdm

        results: list[str | None] = [None] * len(requests)
        # batch requests with the same generation arguments, keeping every answer at its request's index
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted((req.args[1] or {}).items(), key=str)), []).append(i)
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="mmtoken generate")
        for idx in groups.values():
            gen = requests[idx[0]].args[1] or {}
            until = gen.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            kwargs = self._generate_kwargs(gen)
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start : start + self.batch_size]
                inputs = self._inputs([requests[i].args[0] for i in chunk], [self._visual(requests[i]) for i in chunk])
                with torch.inference_mode():
                    seq = self.lm.model.generate(**inputs, **kwargs)
                new = seq[:, inputs["input_ids"].shape[1] :]
                for i, row in zip(chunk, new):
                    text = self.tokenizer.decode(row, skip_special_tokens=True)
                    for stop in until:
                        if stop and stop in text:
                            text = text.split(stop)[0]
                    results[i] = text.strip()
                bar.update(len(chunk))
        bar.close()
        return [r if r is not None else "" for r in results]

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        out = []
        for req in requests:
            context, target, _, doc_id, task, split = req.args[:6]
            continuation = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
            inputs = self._inputs([context], [self._visual(req)])
            cont = self.tokenizer(continuation, add_special_tokens=False, return_tensors="pt")["input_ids"].to(self.device_name)
            n = cont.shape[1]
            if n == 0:
                raise MmtokenError(f"{task} doc {doc_id}: the continuation {continuation!r} has no tokens")
            inputs["input_ids"] = torch.cat([inputs["input_ids"], cont], dim=1)
            inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(cont)], dim=1)
            with torch.inference_mode():
                logits = self.lm.model(**inputs).logits[:, -n - 1 : -1].float()
            logp = torch.log_softmax(logits, dim=-1)
            total = float(logp.gather(-1, cont[..., None]).sum())
            greedy = bool((logits.argmax(-1) == cont).all())
            out.append((total, greedy))
        return out

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("multi-round generation is not supported by the mmtoken lmms-eval model")
