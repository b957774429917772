from luca.cli import entry

entry()
