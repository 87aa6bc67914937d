"""nnunet-ext: recent segmentation architectures as trainers for stock nnU-Net v2.

The library (the registry, the plans' topology, networks, blocks, ops and the generated trainers)
and, in `nnunet_ext.tools`, the `nnunet-ext` commands. Light on import: the registry is plain
Python, and networks, trainers and optional dependencies are imported where they are used, so
`nnunet-ext env` or reading the registry never pulls in torch.
"""

__version__ = "0.1.0"
