"""Weight searchers: round to nearest and COMQ, each registered against its typed config
(see onnxq.weights.registry). Importing this package registers them."""

from onnxq.weights import rtn, search_comq  # noqa: F401  (each registers its searcher)
