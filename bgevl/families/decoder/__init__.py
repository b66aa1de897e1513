"""The decoder-embedder base: a multimodal LLM whose embedding is the L2-normalized final hidden state of the
last prompt token, with a task instruction on queries (BGE-VL-MLLM's LLaVA-NeXT, BGE-VL-Screenshot's Qwen2.5-VL).

What such families share is declared or implemented here once: the roles (a query's prompt holds the
instruction, a candidate's does not), weight-only int8 (the activations of LLM decoders carry outlier channels
that per-tensor int8 ranges cannot hold: LLM.int8(), SmoothQuant), the 2/8 batch range of a prefill, the Triton
repository (a preprocess model, a vision and a language encoder, the entry model running the recipe by BLS), the
serving inputs and the benchmark's requests. A subclass declares its two graphs, its query instruction and its
preprocess model's outputs, and implements what is its own: the checkpoint, the graphs' modules, the
preprocessor (prompts, image layout) and the recipe's steps. ``modules`` holds the torch pieces both decoders'
language graphs use (causal mask with padding, last-token pooling).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Mapping

from numpy.typing import NDArray

from bgevl.checkpoints import HubCheckpoints
from bgevl.core.errors import BgevlError
from bgevl.core.family import CANDIDATE, QUERY, Family, Int8Form, Request, TritonModels
from bgevl.core.preprocessing import one_value_per_request
from bgevl.core.specs import SERVING_IMAGE, SERVING_INSTRUCTION, SERVING_ROLE, SERVING_TEXT, ModelSpec, TensorSpec

if TYPE_CHECKING:  # pragma: no cover  (types only)
    from bgevl.core.manifest import Manifest
    from bgevl.core.options import ExportOptions

#: the int8 forms of a decoder embedder: weight-only, no calibration
WEIGHT_ONLY_INT8 = (
    Int8Form("weight-only-qdq", "int8 weights + DequantizeLinear into the MatMuls, float activations (TensorRT "
             "weight-only INT8, ONNX Runtime)", calibrated=False, mode="qdq"),
    Int8Form("weight-only-dynamic", "int8 weights in ONNX Runtime's MatMulNBits (CPU), float activations",
             calibrated=False, mode="dynamic"),
)


class DecoderEmbedderFamily(HubCheckpoints, Family):
    #: the recipe's two graphs: the vision graph runs on the images, the language graph on the batch
    vision_graph: ClassVar[str]
    language_graph: ClassVar[str]
    #: the query instruction of the model's card (benchmark and perf_analyzer queries, the API's default)
    query_instruction: ClassVar[str]

    default_batch = (2, 8)  # a prefill of hundreds to thousands of tokens per item is far heavier than a tower
    int8_forms = WEIGHT_ONLY_INT8
    bench_grows_max_batch = False
    serving_inputs = (SERVING_IMAGE, SERVING_TEXT, SERVING_INSTRUCTION, SERVING_ROLE)
    roles_matter = True  # q_or_c: the query prompt holds the instruction, the candidate prompt does not

    @property
    def int8_refusal(self) -> str:  # type: ignore[override]  # the family's name in it
        return f"the {self.name} family's int8 is weight-only; use qdq or dynamic"

    def check_export_options(self, spec: ModelSpec, options: ExportOptions) -> None:
        if options.calibration_data is not None:
            raise BgevlError(f"--calibration-data does not apply to the {self.name} family: its int8 is weight-only and "
                             f"needs no calibration")

    def default_instruction(self, recipe: Mapping[str, Any]) -> str | None:
        instruction: str | None = recipe.get("default_query_instruction", self.query_instruction)
        return instruction

    # --- Triton ------------------------------------------------------------------------
    #: the preprocess model's outputs by name: those of every request, and those only a request with images has;
    #: each is an input of the graphs (its dtype and shape from their declaration, dynamic axes as -1) or one of
    #: :attr:`host_feeds`
    preprocess_feeds: ClassVar[tuple[tuple[str, ...], tuple[str, ...]]]
    #: feeds the recipe reads on the host (the entry model), not graph inputs
    host_feeds: ClassVar[tuple[TensorSpec, ...]] = ()

    def preprocess_tensors(self, manifest: Manifest) -> list[TensorSpec]:
        """The preprocess model's outputs as the graphs declare them."""
        declared = {t.name: t for t in self.host_feeds}
        for graph in (self.vision_graph, self.language_graph):
            for tensor in manifest.graph_spec(graph).inputs:
                declared.setdefault(tensor.name, tensor)
        return [TensorSpec(name, declared[name].dtype, tuple(-1 if not isinstance(d, int) else d
                                                             for d in declared[name].shape))
                for name in (*self.preprocess_feeds[0], *self.preprocess_feeds[1])]

    def write_triton_models(self, writer: TritonModels) -> None:
        """``<name>_preprocess`` (prompts and image layout; one request per execution: its outputs are not aligned
        on one batch axis), the vision and language encoders and the entry ``<name>`` with INSTRUCTION and ROLE,
        whose recipe calls the encoders by BLS."""
        graph_models = {graph: writer.encoder(graph) for graph in (self.vision_graph, self.language_graph)}
        pre = writer.preprocess(
            [TensorSpec(SERVING_IMAGE, "bytes", (-1,)), TensorSpec(SERVING_TEXT, "bytes", (-1,)),
             TensorSpec(SERVING_INSTRUCTION, "bytes", (1,)), TensorSpec(SERVING_ROLE, "bytes", (1,))],
            self.preprocess_tensors(writer.manifest), writer.batching(0, instances=writer.preprocess_instances))
        writer.entry(writer.batching(writer.manifest.graph_spec(self.language_graph).batch), graph_models, pre)

    def preprocess_outputs(self, present: set[str]) -> list[str]:
        always, with_images = self.preprocess_feeds
        return [*always, *(with_images if SERVING_IMAGE in present else ())]

    def serving_preprocess_inputs(self, inputs: dict[str, NDArray[Any]]) -> dict[str, NDArray[Any]]:
        """IMAGE and TEXT flattened to one value per item; INSTRUCTION and ROLE to one value per request."""
        return {name: values.reshape(-1) if name in (SERVING_IMAGE, SERVING_TEXT) else one_value_per_request(values, name)
                for name, values in inputs.items()}

    # --- benchmarks --------------------------------------------------------------------
    def bench_request(self, workload: str, images: list[Any] | None, texts: list[Any] | None) -> Request:
        """Images are candidates; texts and composed items are queries with the model card's instruction."""
        if workload == "image":
            return Request(images, texts, CANDIDATE)
        return Request(images, texts, QUERY, self.query_instruction)

    def serving_workloads(self, images: list[Any], texts: list[Any]) -> dict[str, Request]:
        return {"candidate_image": Request(images, None, CANDIDATE), "candidate_text": Request(None, texts, CANDIDATE),
                "query": Request(images, texts, QUERY, self.query_instruction)}
