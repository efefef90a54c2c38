"""Media: image codecs shared by workers, producers and viewers (``codec``), and the
RTMP/HLS outputs: the output process (``output_encoder``), its options
(``output_options``), the API's supervisor for it (``output_process``) and
the RTMP and HLS specifics (``rtmp``, ``hls``)."""
