"""Edge bundles built inside Keel: ONNX export, INT8, feature contract, parity, publication.

``keel_edge`` (a top-level package that needs only onnxruntime and NumPy) reads what this
package writes; the ``model_bundle`` asset (``assets/bundle.py``) runs it after registration.
"""
