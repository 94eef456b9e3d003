"""Drop-in integrations.

* ``attnkern.integrations.patch``: route F.scaled_dot_product_attention to attnkern
  (``attnkern.patch`` / ``attnkern.unpatch``).
* ``attnkern.integrations.hf``: ``attn_implementation="attnkern"`` for Hugging Face
  transformers (imports transformers only when used).
"""
