"""The ``pacnet`` command line: argparse verbs; all printing lives here."""
