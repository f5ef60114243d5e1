"""``prism serve``: an HTTP inference server over a live PRISM cluster.

The cluster (:mod:`prism_ext.runtime`) loads the model once on every device
and stays up; this module puts an HTTP API in front of it, in the shapes
OpenAI clients already speak (docs/serve.md):

- ``POST /v1/completions`` (GPT-2; ``stream: true`` sends server-sent events
  token by token: the last device streams each token to rank 0 as it decodes),
- ``POST /v1/embeddings`` (mean pooling over valid tokens, computed where the
  rows are: every device sends its sum and count, not its rows),
- ``POST /v1/classify`` (text, or image files as multipart/form-data for ViT),
- ``GET /v1/models``, ``GET /health`` (every rank alive), ``GET /metrics``
  (Prometheus text format).

One thread (the dispatcher) owns the cluster: requests wait in one queue in
arrival order; consecutive embedding or classification requests with the
same settings and similar lengths are padded into one cluster call (dynamic
batching, ``max_batch`` sequences, a short wait window). A lost rank turns
into 503 errors naming it while the dispatcher forms the cluster again
(local workers are started anew; remote ones must be restarted by their
operator). Every response carries the PRISM stats of its cluster call.

The modules, lowest first: ``options`` (ServeOptions, KNOBS), ``errors``
(the domain errors the backend and the checks raise), ``metrics``,
``backend`` (the queue, batching, the cluster, health, close), ``inputs``
(text -> token ids, image file -> pixels: the only conversions), ``stream``
(tokens -> text as it streams), ``bodies`` (reading and parsing request
bodies), ``validation`` (a request against the model and the operator's
limits), ``responses`` (domain errors -> HTTP status and OpenAI-shaped
bodies), ``completions`` and ``encoders`` (the route handlers), ``app``
(create_app: the routes, the API key, metrics per request) and ``server``
(run_server).
"""

from .app import create_app
from .backend import Backend, Job
from .errors import (BadRequest, BodyTimeout, NotAllowed, NotFound, QueueFull, ServeError, ServerFault, TooLarge,
                     Unauthorized, Unavailable)
from .inputs import decode_tokens, encode_text, image_pixels
from .options import KNOBS, ServeOptions
from .server import run_server

__all__ = ["ServeOptions", "KNOBS", "Backend", "Job", "create_app", "run_server", "encode_text", "decode_tokens",
           "image_pixels", "ServeError", "BadRequest", "Unauthorized", "NotFound", "NotAllowed", "BodyTimeout",
           "TooLarge", "QueueFull", "Unavailable", "ServerFault"]
