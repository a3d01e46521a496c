"""Fine-tuning a UNet to forget: x_t sampling, parameter subsets, the accelerate trainer."""
