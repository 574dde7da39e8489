"""A custom MLServer runtime serving an ONNX encoder with onnxruntime (the peer for attnrec's V2 ModelInfer).

This file runs inside MLServer's own virtual environment (benchmarks/peer/mlserver.py copies
it into the model folder, which MLServer puts on sys.path); the project itself never imports
it. Inputs and outputs are decoded and encoded with MLServer's NumpyCodec, as a user writing a
custom runtime would. Adaptive batching (max_batch_size / max_batch_time) is MLServer's own:
it concatenates requests along the first axis before `predict` and splits the outputs after.

model-settings.json `parameters.extra`: intra_op_threads (0 = all cores), inter_op_threads.
"""

import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri


class OnnxEncoderRuntime(MLModel):
    async def load(self) -> bool:
        uri = await get_model_uri(self._settings)
        extra = (self._settings.parameters.extra if self._settings.parameters else None) or {}
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(extra.get("intra_op_threads", 0))
        opts.inter_op_num_threads = int(extra.get("inter_op_threads", 0))
        self._session = ort.InferenceSession(uri, sess_options=opts, providers=["CPUExecutionProvider"])
        self._outputs = [o.name for o in self._session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = {i.name: NumpyCodec.decode_input(i) for i in payload.inputs}
        results = self._session.run(self._outputs, feeds)
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            outputs=[NumpyCodec.encode_output(name, value) for name, value in zip(self._outputs, results)],
        )
