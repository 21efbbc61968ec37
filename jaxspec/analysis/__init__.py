"""Analyses of trained models: representation similarity (CKA), feature embeddings (UMAP), lesions.

`python -m jaxspec.analysis --workdir=RUN_DIR` analyses a finished `jaxspec.main` run.
"""
