"""kopf controllers, one module per custom resource. Import `ragtune.controllers.registry` to
register every handler (`kopf run -m ragtune.controllers.registry`); importing this package alone
registers nothing, so the CLI can load it cheaply."""
