"""A local sampling page and JSON API over a trained model: `fluid serve RUN`.

`GET /` is the page (prompt, negative prompt, seed, steps, guidance, images; a grid of
results), `GET /api/info` describes the model, and `POST /api/generate` takes
`{"prompt", "negative_prompt", "seed", "steps", "cfg", "temperature", "num_images"}` and
answers `{"images": [base64 PNG, ...], "seed", "seconds"}`; a request that cannot be served is
answered `{"error": "what to send instead"}` with status 400. Concurrent requests with the same
steps, guidance and temperature are sampled by one call (`Batcher`); a request's images
depend on its own prompt, seed and settings alone (`image_keys`).
"""

from ._batcher import Batcher as Batcher
from ._batcher import Job as Job
from ._batcher import ServerClosed as ServerClosed
from ._batcher import Settings as Settings
from ._batcher import image_keys as image_keys
from ._server import FIELDS as FIELDS
from ._server import MAX_BODY as MAX_BODY
from ._server import BadRequest as BadRequest
from ._server import SamplingServer as SamplingServer
from ._server import make_server as make_server
from ._server import serve as serve
