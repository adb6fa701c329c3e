"""``python -m latent_mca``: see :mod:`latent_mca.cli`."""

from latent_mca.cli import main

if __name__ == "__main__":
    main()
