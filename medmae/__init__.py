"""medmae: self-supervised masked-autoencoder pretraining, repair and few-label transfer for 3D scans."""

__version__ = "0.1.0"
