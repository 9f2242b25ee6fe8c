"""The synthetic captioned-shapes domain the embedded model is made for."""
