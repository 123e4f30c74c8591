"""The API's routers, one module per resource. Each ``router(settings)`` builds its routes;
the settings only shape what the OpenAPI document declares (limits such as the largest ``k``),
everything a request needs at run time comes through ``Depends`` (see ``dependencies``)."""
