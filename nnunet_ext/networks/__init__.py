"""One module per architecture; each network takes (topology, input_channels, num_classes, deep_supervision, **options)."""
