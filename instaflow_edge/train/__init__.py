"""The training core: rectified flow, reflow pairs, 2-RF, one-step distillation and evaluation."""
