"""``python -m pacnet`` runs the command line (also what ``torchrun -m pacnet`` starts)."""

from pacnet.cli.main import entry_point

if __name__ == "__main__":
    entry_point()
