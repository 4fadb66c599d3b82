"""Layer types, one module per family; each registers its types on import.

``pacnet.registry`` imports every module here (those not starting with ``_``) the first
time a type is looked up, so a new family only needs a new file.
"""
