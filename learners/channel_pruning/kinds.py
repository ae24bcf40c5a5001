"""The kinds of layer the channel analysis knows: what each does to the channel layout."""

KIND_INPUT = "input"
KIND_PRODUCER = "producer"      # new output channels; reads (and slices) its input channels
KIND_DEPTHWISE = "depthwise"    # per-channel weights, output channels follow the input's
KIND_BATCHNORM = "batchnorm"    # per-channel weights, transparent
KIND_TRANSPARENT = "transparent"
KIND_FLATTEN = "flatten"
KIND_MERGE = "merge"            # element-wise: ties its inputs' spaces
KIND_CONCAT = "concat"          # along the channel axis: joins layouts
KIND_BARRIER = "barrier"        # not understood: inputs fixed, outputs new fixed spaces
KIND_CHANNEL_PAD = "channel_pad"  # zeros before and after the channel axis (ZeroPadding1D in a pad chain)
KIND_PAD_PART = "pad_part"      # Reshape/Permute of a pad chain: passes the layout through
KIND_NESTED = "nested"          # nested model or layer called several times: a barrier
