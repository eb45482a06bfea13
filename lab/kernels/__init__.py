from lab.kernels.flash_attention import available_backends, flash_attention
