from lab.kernels.flash_attention.api import available_backends, flash_attention
