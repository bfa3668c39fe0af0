"""Thin nn.Modules over kernelrl.ops."""
