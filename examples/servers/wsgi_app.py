# The application the uWSGI example serves: one line of text.
def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "6")])
    return [b"uwsgi\n"]
