"""mmrec: a multimodal recommender pipeline.

`pipelines` holds the shared contracts (stage graph, data schema, metrics,
recommender interface, atomic I/O); `tasks` holds one module per stage.
"""

__version__ = "0.1.0"
