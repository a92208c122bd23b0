"""Parts of the docker executor (:mod:`gyoza.agent.docker_executor`): the container
contract, reading a container's output, pulling images."""
