"""`generate.py web`: a browser page to chat with and compare the base and fine-tuned models.

backend.py holds the one loaded model (no Gradio); page.py is the Gradio page and its launch.
"""
