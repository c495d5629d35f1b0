"""TRM-Att itself (`trm`), the model FLOPs formula (`flops`), the reference's checkpoint names (`reference`) and the
portable weights folder (`weights`)."""
