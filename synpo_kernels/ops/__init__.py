"""One op per module: kernel -> launcher -> autograd -> public function -> nn.Module."""
