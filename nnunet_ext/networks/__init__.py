"""One module per architecture. Each network takes (topology, input_channels, num_classes,
deep_supervision, **options), every option with its default in the signature, and builds its own
stages through the stage hooks of `Topology.build_encoder` and `base.UNetDecoder`."""
