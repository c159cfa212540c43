"""The deploy wing: placement on Ray and Ray Serve. The pipeline replica (a Serve deployment running the
engine), layer groups as Ray actors, health of an application's pipelines, starting Ray and Serve, and the
hook that binds Serve's gRPC proxy."""
