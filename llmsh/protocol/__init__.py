"""Wire format shared by the kernel and its clients: connection files, signed sessions, one-shot requests.

Everything here is torch-free; `jupyter_client.session.Session` does the serialising and HMAC signing.
"""
