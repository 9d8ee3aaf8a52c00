from beam_downsample.launch.cli import run

if __name__ == "__main__":
    run()
