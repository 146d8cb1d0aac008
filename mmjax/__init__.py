"""mmjax: multimodal models in pure JAX/Flax, exact against the references people trust.

Submodules (each one concept): ``attention``, ``layers``, ``vit``, ``text``, ``clip``, ``tokenizer``,
``graph``, ``gnn``, ``losses``, ``evaluate``, ``convert``, ``data``, ``train``.
"""

__version__ = "0.1.0"
