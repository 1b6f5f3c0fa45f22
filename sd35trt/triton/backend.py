"""The Triton Python-backend model: what the generated ``model.py`` delegates to.

The generated file only binds Triton's utilities to this class::

    import triton_python_backend_utils as pb_utils
    from sd35trt.triton.backend import Sd35TritonModel

    class TritonPythonModel(Sd35TritonModel):
        pb_utils = pb_utils

so the server runs the same code as ``sd35trt run`` and ``sd35trt serve`` (same validation
messages, same engine batching rule). Nothing here imports Triton.
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sd35trt.errors import RequestError, Sd35TrtError
from sd35trt.parameters import canonical_fields
from sd35trt.serve.generator import ImageSet, Prepared, run_alone_on_failure
from sd35trt.triton.spec import INPUTS, OUTPUTS, TritonType

#: config.pbtxt ``parameters``: where the engines are (relative to the version directory, or absolute).
ENGINES_DIR_PARAMETER = "engines_dir"
#: config.pbtxt ``parameters``: ONNX Runtime intra-op threads per instance ("" = ONNX Runtime's default).
INTRA_OP_THREADS_PARAMETER = "intra_op_threads"
#: config.pbtxt ``parameters``: most images one row may ask for ("" = the runtime's default).
MAX_IMAGES_PARAMETER = "max_images"


def engine_batches(items: Sequence[Prepared]) -> list[list[int]]:
    """Group validated rows into engine batches, the way ``sd35trt serve``'s batcher does.

    The oldest row not yet placed opens a batch; later rows with the same batch key (size, steps,
    guidance) join it while its images fit the engine batch (``capacity``) and its prompts fit
    the text encoders (``max_requests``). Other rows keep their order for the next batches.
    Returns indices into ``items`` (in arrival order), one list per engine batch, in running order.
    """
    left = list(range(len(items)))
    batches: list[list[int]] = []
    while left:
        first = left.pop(0)
        head = items[first]
        batch, total = [first], head.size
        for i in list(left):
            if total >= head.capacity or len(batch) >= head.max_requests:
                break
            item = items[i]
            if item.key == head.key and total + item.size <= head.capacity:
                left.remove(i)
                batch.append(i)
                total += item.size
        batches.append(batch)
    return batches


def _value(name: str, dtype: TritonType, raw: Any) -> Any:
    """One cell of an input tensor as the Python value ``GenerationRequest`` takes."""
    if dtype is TritonType.STRING:
        data = raw if isinstance(raw, bytes) else str(raw).encode()
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise RequestError(
                name, f"{name} is not valid UTF-8 text (invalid byte at position {err.start})"
            ) from None
    if dtype is TritonType.FP64:
        return float(raw)
    if dtype is TritonType.BOOL:
        return bool(raw)
    return int(raw)  # numpy integers are not ``int``: the runtime's checks want Python ints


def read_rows(columns: dict[str, Any], rows: int) -> list[dict[str, Any]]:
    """One dict of HTTP field names per row (aliases under their parameter's name) from
    ``columns``: input name -> ``[rows, 1]``, or ``[rows, k]`` for a ControlNet field (one value
    per control image). Omitted inputs are left out (engine defaults apply).

    Raises:
        RequestError: a text input is not UTF-8, an input does not hold one value per row, or a
            parameter came under two of its names.
    """
    out: list[dict[str, Any]] = [{} for _ in range(rows)]
    for spec in INPUTS:
        array = columns.get(spec.name)
        if array is None:
            continue
        listed = spec.dims == (-1,)
        if (
            array.ndim != 2
            or array.shape[0] != rows
            or (array.shape[1] != 1 and not listed)
            or not array.shape[1]
        ):
            expected = (
                f"[{rows}, k] (k values per prompt, one per control image)" if listed else f"[{rows}, 1]"
            )
            raise RequestError(
                spec.name,
                f"{spec.name} has shape {list(array.shape)}; expected {expected} (one row per prompt)",
            )
        for row, cells in zip(out, array, strict=True):
            values = [_value(spec.name, spec.dtype, cell) for cell in cells]
            row[spec.name] = values if len(values) > 1 else values[0]
    return [canonical_fields(row) for row in out]


def _joined(parts: list[tuple[ImageSet | BaseException, dict]]) -> tuple[ImageSet | BaseException, dict]:
    """One row's result from its parts': the first failure, else the images joined (first part's batch)."""
    for result, info in parts:
        if isinstance(result, BaseException):
            return result, info
    return ImageSet.joined([r for r, _ in parts]), parts[0][1]


class Sd35TritonModel:
    """Triton Python-backend model over :class:`~sd35trt.runtime.pipeline.Sd35Runtime`.

    Subclass it with ``pb_utils`` bound to Triton's ``triton_python_backend_utils`` (the
    generated ``model.py`` does). One instance per Triton model instance: each loads its own
    runtime, on ``cuda:<device id>`` for a KIND_GPU instance, on the CPU for KIND_CPU.
    """

    pb_utils: Any = None

    def initialize(self, args: dict[str, str]) -> None:
        """Verify and load the engines named by the config's ``engines_dir`` parameter.

        Raises:
            Sd35TrtError: the engines are missing, damaged or built for another machine (the
                message names the file and the fix; Triton reports the model as failed).
        """
        from sd35trt.runtime.pipeline import Sd35Runtime
        from sd35trt.serve.runtime_adapter import RuntimeGenerator

        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        declared = {t["name"] for t in config.get("input", [])}
        missing = [t.name for t in INPUTS if t.name not in declared]
        if missing:
            raise Sd35TrtError(
                f"the model config of {config.get('name')!r} lacks the inputs {missing}; "
                "regenerate the repository with `sd35trt triton`"
            )
        engines = Path(params.get(ENGINES_DIR_PARAMETER) or "engines")
        if not engines.is_absolute():
            engines = Path(args["model_repository"]) / args["model_version"] / engines
        gpu = args.get("model_instance_kind") == "GPU"
        device = f"cuda:{args.get('model_instance_device_id', '0')}" if gpu else "cpu"
        threads = params.get(INTRA_OP_THREADS_PARAMETER) or None
        max_images = params.get(MAX_IMAGES_PARAMETER) or None
        self.runtime = Sd35Runtime.load(
            engines,
            device=device,
            intra_op_threads=int(threads) if threads else None,
            max_images=int(max_images) if max_images else None,
        )
        self.generator = RuntimeGenerator(self.runtime)
        self._batches = 0
        self._log("info", f"loaded {engines} on {device} ({args.get('model_instance_name', '')})")

    def finalize(self) -> None:
        """Free the engines (Triton unloads the model)."""
        runtime = getattr(self, "runtime", None)
        if runtime is not None:
            runtime.close()

    # -- requests ------------------------------------------------------------------------------

    def execute(self, requests: Sequence[Any]) -> list[Any]:
        """Answer the requests Triton's dynamic batcher handed over together.

        Every row is validated first (an invalid request gets its own error, the others run);
        the valid rows run in engine batches of compatible rows (:func:`engine_batches`); a row of
        more images than one engine batch holds runs as several parts, each image keeping its
        seed (``seed + i``). Returns one ``InferenceResponse`` per request, in order.
        """
        responses: list[Any] = [None] * len(requests)
        items: list[Prepared] = []
        owners: list[tuple[int, int]] = []  # (request index, row) of each item
        for i, request in enumerate(requests):
            try:
                fields = read_rows(self._columns(request), self._rows(request))
                prepared = [self.generator.prepare(f) for f in fields]
                if len(counts := sorted({p.size for p in prepared})) > 1:
                    raise RequestError(
                        "num_images",
                        f"num_images must be equal for every prompt of one request (found {counts}); "
                        "send prompts with different counts as separate requests",
                    )
            except RequestError as err:
                responses[i] = self._error(err)
                continue
            for row, p in enumerate(prepared):
                parts = p.split(p.capacity) if p.size > p.capacity and p.split else [p]
                items.extend(parts)
                owners.extend([(i, row)] * len(parts))

        results: list[tuple[ImageSet | BaseException, dict]] = [None] * len(items)  # type: ignore[list-item]
        for batch in engine_batches(items):
            for k, result in zip(batch, self._run([items[k] for k in batch]), strict=True):
                results[k] = result

        for i in range(len(requests)):
            if responses[i] is None:
                rows = sorted({row for owner, row in owners if owner == i})
                mine = [[k for k, owner in enumerate(owners) if owner == (i, row)] for row in rows]
                responses[i] = self._response(
                    [items[ks[0]] for ks in mine], [_joined([results[k] for k in ks]) for ks in mine]
                )
        return responses

    def _run(self, batch: list[Prepared]) -> list[tuple[ImageSet | BaseException, dict]]:
        """One engine batch; when it fails as a whole, each row again alone (serve's rule)."""
        self._batches += 1
        started = time.perf_counter()

        def failed(err: BaseException) -> None:
            self._log("warn", f"engine batch of {len(batch)} rows failed ({err}); re-running each alone")

        results, retried = run_alone_on_failure(self.generator.run_batch, batch, on_failure=failed)
        if retried:
            return [
                (r, {"id": self._batches, "requests": 1, "images": p.size, "retried_alone": True})
                for r, p in zip(results, batch, strict=True)
            ]
        info = {
            "id": self._batches,
            "requests": len(batch),
            "images": sum(p.size for p in batch),
            "retried_alone": False,
            "run_ms": round((time.perf_counter() - started) * 1000, 2),
        }
        return [(r, info) for r in results]

    def _response(self, rows: list[Prepared], results: list[tuple[ImageSet | BaseException, dict]]) -> Any:
        import numpy as np

        pb = self.pb_utils
        for result, _ in results:
            if isinstance(result, BaseException):
                return self._error(result)
        images = np.array(
            [[res.png(im, j) for j, im in enumerate(res.images)] for res, _ in results], dtype=np.object_
        )  # [rows, num_images] PNG files

        def column(values: list) -> Any:
            return np.array([[json.dumps(v).encode()] for v in values], dtype=np.object_)  # [rows, 1]

        tensors = {
            "images": images,
            "parameters": column(
                [dict(res.parameters or p.params) for p, (res, _) in zip(rows, results, strict=True)]
            ),
            "warnings": column([list(res.warnings) for res, _ in results]),
            "batch": column([info for _, info in results]),
        }
        return pb.InferenceResponse(output_tensors=[pb.Tensor(t.name, tensors[t.name]) for t in OUTPUTS])

    # -- Triton plumbing -----------------------------------------------------------------------

    def _columns(self, request: Any) -> dict[str, Any]:
        out = {}
        for spec in INPUTS:
            tensor = self.pb_utils.get_input_tensor_by_name(request, spec.name)
            if tensor is not None:
                out[spec.name] = tensor.as_numpy()
        return out

    def _rows(self, request: Any) -> int:
        return int(self.pb_utils.get_input_tensor_by_name(request, "prompt").as_numpy().shape[0])

    def _error(self, err: BaseException) -> Any:
        """An error response: the message and status ``sd35trt serve`` gives, as a Triton code."""
        from sd35trt.serve.responses import ApiError

        pb = self.pb_utils
        answer = ApiError.of(err)
        if answer.status == 500 and not isinstance(err, Sd35TrtError):
            self._log("error", "".join(traceback.format_exception(err)))
        value = getattr(pb.TritonError, answer.triton_code, None)
        error = pb.TritonError(answer.message) if value is None else pb.TritonError(answer.message, value)
        return pb.InferenceResponse(output_tensors=[], error=error)

    def _log(self, level: str, message: str) -> None:
        logger = getattr(self.pb_utils, "Logger", None)
        if logger is not None:
            getattr(logger, f"log_{level}")(message)
